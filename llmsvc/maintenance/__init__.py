"""Looking after the store: consistency and gap checks (retention and backups to come)."""
