"""Administration commands for the PostgreSQL store: `pop3d db`, `pop3d user`, `pop3d import`."""
