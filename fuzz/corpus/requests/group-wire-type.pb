
g