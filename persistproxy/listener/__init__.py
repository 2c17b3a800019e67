"""
Where every connection starts: binding, admission and limits, holding, drain registration, TLS
wrapping, done once around whatever factory a protocol plugin returns.
"""
