
g
xe