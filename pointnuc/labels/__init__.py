"""Training targets made from points: detection masks (stage 1), Voronoi and cluster labels (stage 2)."""
