"""The supervisor's durable state: task records and the event outbox, in one SQLite file."""
