@echo off
rem twisted-gateway launcher (Windows ZIP): runs gateway.ps1, which creates the environment
rem offline on first start and then runs the gateway with etc\gateway.yaml.
powershell.exe -NoProfile -ExecutionPolicy Bypass -File "%~dp0gateway.ps1" %*
