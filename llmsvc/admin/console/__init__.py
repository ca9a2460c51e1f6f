"""The operator's web console under `/console/`: server-rendered pages over the admin surface."""
