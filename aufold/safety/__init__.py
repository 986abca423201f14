"""What keeps a user's files and models safe: guarded outputs, limits on edits, signals."""
