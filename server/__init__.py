"""lorahive serving engine and its HTTP face."""
