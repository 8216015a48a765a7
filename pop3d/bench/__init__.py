"""`pop3d bench` and `pop3d mkmaildrops`: a load generator for any POP3 server, and fixtures for it.

Modules: `hist` (mergeable latency histograms), `client` (an asyncio.Protocol POP3 client that only counts
octets), `stats` (what a run measures), `commands` (one timed command, the connection), `logins` (USER/PASS,
APOP, SASL PLAIN and SCRAM), `scenarios` (what one session does), `runner` (closed/open loop over many clients
and processes), `thresholds` (the `--fail-if` grammar), `report` (progress and interval lines, table, JSON),
`units` (durations), `names` (what the command line offers), `mkmaildrops` (synthetic users and maildrops),
`cli` (arguments, exit statuses).
"""
