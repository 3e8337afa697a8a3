"""The conversation's rules, without I/O: a state machine per connection (core.py), the actions
it asks its shell to carry out (actions.py), and what they hand each other (records.py)."""
