# Register twisted-gateway as a Windows service with the Service Control Manager, using NSSM
# (https://nssm.cc, a single executable you place on PATH) to supervise gateway.cmd.
# Run from an elevated PowerShell:  .\bin\install-service.ps1 [-Name twisted-gateway]
param([string]$Name = "twisted-gateway")
$ErrorActionPreference = "Stop"
$Root = Split-Path -Parent $PSScriptRoot
$Cmd = Join-Path $PSScriptRoot "gateway.cmd"
if (-not (Get-Command nssm.exe -ErrorAction SilentlyContinue)) { throw "nssm.exe is not on PATH" }
& nssm.exe install $Name $Cmd
& nssm.exe set $Name AppDirectory $Root
& nssm.exe set $Name AppStdout (Join-Path $Root "gateway.log")
& nssm.exe set $Name AppStderr (Join-Path $Root "gateway.log")
# Stop: NSSM sends Ctrl+C first, which the gateway treats like SIGTERM (drain, then exit).
& nssm.exe set $Name AppStopMethodConsole 35000
& nssm.exe start $Name
