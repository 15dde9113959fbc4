"""Protocol edges: bytes in, Submission out; Delivery in, bytes out. No routing here."""
