"""Who is asking: SMART authorization (tokens, scopes, registered clients) and the access context."""
