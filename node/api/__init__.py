"""The node's HTTP face: a REST API for the people who watch and steer the queue, with users,
roles and tokens, and the health endpoints a supervisor polls."""
