"""The embedded OC20-like dataset: adsorbates on metal and alloy slabs, labelled by ASE's EMT.

* :mod:`~forcenet.emt.generate`: plans the systems of every split and writes them in
  OC20's raw format (:func:`~forcenet.emt.generate.generate_emt`);
* :mod:`~forcenet.emt.system`: one system (relaxation and MD frames of an adsorbate on a
  slab);
* :mod:`~forcenet.emt.slabs`, :mod:`~forcenet.emt.adsorbates`: the catalysts and the
  adsorbates, with the in-domain and held-out partitions of each.
"""
