"""shoal's authenticated wire, which the parameter server and a federation's server and
clients speak: the message format (:mod:`~shoal.net.wire`), the listener that lets
in only peers that know the job's secret and proves it knows it too
(:mod:`~shoal.net.gate`), and the connection to one peer (:mod:`~shoal.net.peer`)."""
