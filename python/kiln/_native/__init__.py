"""gopy-generated bindings over Kiln's Go core (bindings/)."""
