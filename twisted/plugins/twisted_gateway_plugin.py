from twisted.application.service import ServiceMaker

gateway = ServiceMaker(
    "twisted-gateway",
    "twisted_gateway.tap",
    "TLS/SNI gateway routing <label>-<port>.<hostname> to shard containers",
    "gateway",
)
