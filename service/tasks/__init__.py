"""Task endpoints over HTTP (/v1/...): parse uploads and JSON, call the core, serialize."""
