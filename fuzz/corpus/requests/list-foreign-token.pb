
gp1.zz