"""Development scripts (the wheel and sdist checks); not part of the kerasbn package or its wheel."""
