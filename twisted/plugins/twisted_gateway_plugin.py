from twisted.application.service import ServiceMaker

gateway = ServiceMaker(
    "twisted-gateway",
    "twisted_gateway.tap",
    "TLS/SNI gateway routing <label>-<port>.<hostname> to shard containers",
    "gateway",
)

from twisted.application.reactors import Reactor  # noqa: E402

uvloop = Reactor("uvloop", "twisted_gateway.reactors",
                 "asyncio reactor on a uvloop event loop (pip install uvloop)")
