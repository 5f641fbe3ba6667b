"""The shared vocabulary, on the ground floor: every layer may import it, it imports no layer.

- :mod:`.naming`: the team-id rule, object names and label keys;
- :mod:`.models`: the values the layers pass each other (instances, their status);
- :mod:`.limits`: sizes and the capability allow-list both catalog readers share;
- :mod:`.team_tokens`: the API's stateless team tokens (the API and the ingress gate check them);
- :mod:`.signals`: the control signals "on another host" and "busy, later" (not errors).
"""
