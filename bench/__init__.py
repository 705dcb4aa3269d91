"""`just bench`: an open-loop benchmark of the running system (latency, sustained rate, CPU).

`load` drives the gateway on a fixed schedule, `cpu` reads each process's CPU time from /proc,
`profile` samples stacks with py-spy, `report` turns the measurements into JSON, a chart and a
table; `run` strings the phases together and `__main__` is the command line."""
