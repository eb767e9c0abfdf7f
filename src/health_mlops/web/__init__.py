"""The HTTP edge every service shares: uvicorn's protocol with its limits, the byte limits and blocked paths in
front of an application, one answer for invalid requests, strict JSON."""
