# twisted-gateway launcher (Windows ZIP). On first start it creates .\venv from .\wheels without
# network access (Python 3.11 from python.org, found with the "py" launcher), then runs the
# gateway with etc\gateway.yaml. Extra arguments are passed on, e.g. -- --tls-port 8443.
$ErrorActionPreference = "Stop"
$Root = Split-Path -Parent $PSScriptRoot
$Venv = Join-Path $Root "venv"
$Twistd = Join-Path $Venv "Scripts\twistd.exe"
if (-not (Test-Path $Twistd)) {
    Write-Host "gateway: creating $Venv from the bundled wheels (offline)"
    & py -3.11 -m venv $Venv
    if ($LASTEXITCODE -ne 0) { throw "Python 3.11 is needed (py -3.11)" }
    & (Join-Path $Venv "Scripts\pip.exe") install --quiet --no-index --find-links (Join-Path $Root "wheels") twisted-gateway
    if ($LASTEXITCODE -ne 0) { throw "installing the bundled wheels failed" }
}
Set-Location $Root
# One worker: the multi-process supervisor relies on POSIX process and socket features.
& $Twistd -n --pidfile= gateway --config (Join-Path $Root "etc\gateway.yaml") --workers 1 @args
exit $LASTEXITCODE
