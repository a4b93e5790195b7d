"""Generate the meshes shipped in meshes/ with gmsh's Python API (gmsh from PyPI).

    python meshes/make_meshes.py            # rewrites every .msh file here

plate_with_holes.msh: the unit square with two circular holes (OpenCASCADE booleans).
Physical groups: surface 1; boundary lines 1 = outer square, 2 = the holes' circles.

channel_with_cylinder.msh: the channel [0, 2.2] x [0, 0.41] with a cylinder of radius 0.05 at
(0.2, 0.2) (the DFG benchmark's geometry). Physical groups: surface 1; boundary lines 1 = inlet
(x = 0), 2 = outlet (x = 2.2), 3 = walls (y = 0, 0.41), 4 = cylinder.

block_with_holes.msh: the plate with holes in 3D: the box [0, 1] x [0, 1] x [0, 0.5] minus two
cylinders along z through it (the plate's holes). Physical groups: volume 1; boundary surfaces
1 = the box's six faces, 2 = the holes' walls. Coarse (h = 0.1); refine it uniformly in
Firedrake (``MeshHierarchy``, 8x the cells per level) for the sizes of the scale benchmark.

periodic_square.msh: the unit square, unstructured, periodic in x and y (gmsh's periodic
meshing: the right side's nodes are the left side's moved by (1, 0), the top's the bottom's
moved by (0, 1)). Physical group: surface 1 (it has no boundary).
"""
import contextlib
import os
import sys

import gmsh

HERE = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def _meshed(path, name, h, msh_version, dim=2):
    """gmsh started with a model ``name``; after the body (the geometry and physical groups)
    the mesh is generated with element size at most ``h`` and written to ``path`` in MSH
    ``msh_version``; gmsh is finalized whatever happens."""
    gmsh.initialize(["", "-v", "0"])
    try:
        gmsh.model.add(name)
        yield
        gmsh.option.setNumber("Mesh.CharacteristicLengthMax", h)
        gmsh.option.setNumber("Mesh.MshFileVersion", msh_version)
        gmsh.model.mesh.generate(dim)
        gmsh.write(path)
    finally:
        gmsh.finalize()


def _cut_and_mesh(path, name, h, rectangle, disks, marker):
    """Mesh a rectangle (x, y, width, height) minus disks (x, y, radius) with gmsh: physical
    surface 1; each boundary curve in the physical line group ``marker(x0, y0, x1, y1)`` returns
    for its bounding box (which gmsh pads by its geometric tolerance, ~1e-7); element size at
    most ``h``; written to ``path`` as MSH 2.2."""
    with _meshed(path, name, h, 2.2):
        occ = gmsh.model.occ
        outer = occ.addRectangle(rectangle[0], rectangle[1], 0, rectangle[2], rectangle[3])
        occ.cut([(2, outer)], [(2, occ.addDisk(x, y, 0, r, r)) for x, y, r in disks])
        occ.synchronize()
        _physical_groups(2, lambda box: marker(box[0], box[1], box[3], box[4]))


def _physical_groups(dim, marker):
    """Physical group 1: every entity of dimension ``dim``; their boundary entities in the
    physical group ``marker(bounding box (x0, y0, z0, x1, y1, z1))`` returns (gmsh pads boxes
    by its geometric tolerance, ~1e-7)."""
    entities = [tag for _, tag in gmsh.model.getEntities(dim)]
    gmsh.model.addPhysicalGroup(dim, entities, 1)
    groups = {}
    for _, tag in gmsh.model.getBoundary([(dim, e) for e in entities], oriented=False):
        groups.setdefault(marker(gmsh.model.getBoundingBox(dim - 1, tag)), []).append(tag)
    for group, tags in sorted(groups.items()):
        gmsh.model.addPhysicalGroup(dim - 1, tags, group)


def plate_with_holes(path, h=0.05):
    def marker(x0, y0, x1, y1):
        return 1 if min(x0, y0) < 1e-8 or max(x1, y1) > 1 - 1e-8 else 2
    _cut_and_mesh(path, "plate_with_holes", h, (0, 0, 1, 1),
                  [(0.3, 0.35, 0.12), (0.68, 0.62, 0.15)], marker)


def channel_with_cylinder(path, h=0.06):
    L, H = 2.2, 0.41

    def marker(x0, y0, x1, y1):
        if x1 < 1e-5:
            return 1            # inlet
        if x0 > L - 1e-5:
            return 2            # outlet
        if y1 < 1e-5 or y0 > H - 1e-5:
            return 3            # walls
        return 4                # cylinder
    _cut_and_mesh(path, "channel_with_cylinder", h, (0, 0, L, H), [(0.2, 0.2, 0.05)], marker)


def block_with_holes(path, h=0.1):
    with _meshed(path, "block_with_holes", h, 2.2, dim=3):
        occ = gmsh.model.occ
        box = occ.addBox(0, 0, 0, 1, 1, 0.5)
        occ.cut([(3, box)], [(3, occ.addCylinder(x, y, -0.1, 0, 0, 0.7, r))
                             for x, y, r in [(0.3, 0.35, 0.12), (0.68, 0.62, 0.15)]])
        occ.synchronize()
        # A face of the box is flat; the holes' walls are curved.
        _physical_groups(3,
                         lambda box: 1 if min(box[3] - box[0], box[4] - box[1], box[5] - box[2])
                         < 1e-5 else 2)


def periodic_square(path, h=0.0625):
    # MSH 4.1: PETSc reads its $Periodic section (node pairs) and makes the mesh periodic.
    with _meshed(path, "periodic_square", h, 4.1):
        surface = gmsh.model.occ.addRectangle(0, 0, 0, 1, 1)
        gmsh.model.occ.synchronize()
        gmsh.model.addPhysicalGroup(2, [surface], 1)
        sides = {}
        for _, tag in gmsh.model.getBoundary([(2, surface)], oriented=False):
            x0, y0, _, x1, y1, _ = gmsh.model.getBoundingBox(1, tag)
            sides[("left" if x1 < 1e-5 else "right") if x1 - x0 < 1e-5 else
                  ("bottom" if y1 < 1e-5 else "top")] = tag

        def shift(dx, dy):      # a 4x4 affine map, row-major, as gmsh wants it
            return [1, 0, 0, dx, 0, 1, 0, dy, 0, 0, 1, 0, 0, 0, 0, 1]
        gmsh.model.mesh.setPeriodic(1, [sides["right"]], [sides["left"]], shift(1, 0))
        gmsh.model.mesh.setPeriodic(1, [sides["top"]], [sides["bottom"]], shift(0, 1))


if __name__ == "__main__":
    h = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
    plate_with_holes(os.path.join(HERE, "plate_with_holes.msh"), h)
    channel_with_cylinder(os.path.join(HERE, "channel_with_cylinder.msh"))
    periodic_square(os.path.join(HERE, "periodic_square.msh"))
    block_with_holes(os.path.join(HERE, "block_with_holes.msh"))
