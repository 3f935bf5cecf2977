"""Operator tools above the services: the process supervisor of ``make run``, the scheduler of
the daily/weekly maintenance, backup and restore, and the log reader."""
