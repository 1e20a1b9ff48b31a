"""Command-line programs: each parses its arguments, then calls the library."""
