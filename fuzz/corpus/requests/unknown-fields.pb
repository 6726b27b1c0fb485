Jextra
gxs