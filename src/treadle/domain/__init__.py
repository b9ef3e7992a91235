"""Pure domain model: entities, state machines and errors. Imports nothing else of treadle."""
