"""Night over night: how each committed labelling run compares with the runs before it."""
