"""
The hybrid deployment's link to a hosted control plane (docs/cloud.md): the cloud token
(L{token}), the directory and settings pulled from ``/sync`` (L{sync}), the analytics pushed
to ``/reports`` (L{reports}), and the reference control plane (L{controlplane}).
"""
