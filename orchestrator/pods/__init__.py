"""Pods: the cluster as Kubernetes objects (confidential containers for the masters), rendered
for a Kubernetes cluster or run on this host with `podman kube play`.

One job per module: `initdata` (the CoCo initdata TOML, its annotation and digest),
`manifests` (the objects, two targets), `render_cmd` (`gcvm render --runtime pods`), `podman`
(private podman configuration inside the cluster's namespace, the image), `lifecycle`
(`gcvm up|down --runtime pods`).
"""
