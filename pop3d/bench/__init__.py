"""`pop3d bench` and `pop3d mkmaildrops`: a load generator for any POP3 server, and fixtures for it.

Modules: `hist` (mergeable latency histograms), `client` (an asyncio.Protocol POP3 client that only counts
octets), `scenarios` (what one session does), `runner` (closed/open loop over many clients and processes),
`report` (progress line, table, JSON), `mkmaildrops` (synthetic users and maildrops), `cli` (arguments).
"""
