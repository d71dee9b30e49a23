"""Load generation against a running scheduler: ``lingua-scheduler loadtest`` and the benchmarks.

Owns the cheap client side of a load test: a minimal WebSocket client (``wsclient``), a fleet of
simulated nodes and a crowd of simulated sessions that one process can drive by the thousand
(``fleet``, ``crowd``), the worker processes that run them apart from the scheduler (``workers``),
reading the scheduler's own figures (``metrics``), and the command's orchestration, report and
summary (``runner``).

Must never: import the server, share a process with the scheduler it measures, or target anything
but the address it is given (benchmarks and tests give 127.0.0.1).
"""
