
g/../etcs s
x