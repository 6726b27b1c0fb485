
g
xd"	ü©ñÒMbP?