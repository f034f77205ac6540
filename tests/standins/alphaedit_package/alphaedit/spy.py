CALLS = []  # names of the stand-in functions that ran
