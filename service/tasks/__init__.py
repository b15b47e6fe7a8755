"""Task endpoints: per-family pre/post-processing shared by the HTTP routes and batch inference."""
