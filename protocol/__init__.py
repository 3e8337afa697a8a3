"""The sans-I/O core of the persona chat protocol: frames, errors, commands, personas, schema."""
