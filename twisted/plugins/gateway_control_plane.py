from twisted.application.service import ServiceMaker

control_plane = ServiceMaker(
    "twisted-gateway-control-plane",
    "twisted_gateway.cloud.controlplane",
    "The reference control plane of twisted-gateway's hybrid mode: /sync, /reports, /jwks.json",
    "gateway-control-plane",
)
