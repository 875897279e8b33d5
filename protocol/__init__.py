"""Sans-IO protocol code: bytes in, events out. Imports nothing else of ours."""
