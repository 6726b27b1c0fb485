
/srv/handid/checkpoints/v2