"""EHR sync: pull from and push to external EHRs over FHIR R4 (issue #7).

config (connections), client (the one HTTP owner), auth (SMART Backend Services), pull + bulk
(incoming), outbox + push + worker (outgoing), cli.
"""
