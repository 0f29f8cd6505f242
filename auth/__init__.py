"""Identity -> credential: the authenticators of both modes."""
