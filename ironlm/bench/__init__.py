"""`ironlm bench`: machine probes, random-weight model shapes, speed measurements held to a roofline, reports."""
