"""The core of Relais: config, ingest with group commit, HL7 acceptance, CLI."""
