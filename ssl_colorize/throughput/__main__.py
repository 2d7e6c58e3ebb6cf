"""One throughput measurement in this process (started by :mod:`ssl_colorize.throughput.runner`)."""

from ssl_colorize.throughput.runner import job_main

job_main()
