"""
The operator's view on the plain port: a read-only admin API under C{/api/v1/} (L{views}, described
by L{openapi}), the static dashboard page that reads it (C{static/}), and the optional bearer
token that guards both (L{access}).
"""
