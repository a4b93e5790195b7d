"""Generate the meshes shipped in meshes/ with gmsh's Python API (gmsh from PyPI).

    python meshes/make_meshes.py            # rewrites every .msh file here

plate_with_holes.msh: the unit square with two circular holes (OpenCASCADE booleans).
Physical groups: surface 1; boundary lines 1 = outer square, 2 = the holes' circles.

channel_with_cylinder.msh: the channel [0, 2.2] x [0, 0.41] with a cylinder of radius 0.05 at
(0.2, 0.2) (the DFG benchmark's geometry). Physical groups: surface 1; boundary lines 1 = inlet
(x = 0), 2 = outlet (x = 2.2), 3 = walls (y = 0, 0.41), 4 = cylinder.
"""
import os
import sys

import gmsh

HERE = os.path.dirname(os.path.abspath(__file__))


def plate_with_holes(path, h=0.05):
    gmsh.initialize(["", "-v", "0"])
    try:
        gmsh.model.add("plate_with_holes")
        occ = gmsh.model.occ
        plate = occ.addRectangle(0, 0, 0, 1, 1)
        holes = [occ.addDisk(0.3, 0.35, 0, 0.12, 0.12), occ.addDisk(0.68, 0.62, 0, 0.15, 0.15)]
        occ.cut([(2, plate)], [(2, d) for d in holes])
        occ.synchronize()
        surfaces = [tag for _, tag in gmsh.model.getEntities(2)]
        gmsh.model.addPhysicalGroup(2, surfaces, 1)
        outer, circles = [], []
        for _, tag in gmsh.model.getBoundary([(2, s) for s in surfaces], oriented=False):
            x0, y0, _, x1, y1, _ = gmsh.model.getBoundingBox(1, tag)
            on_square = min(x0, y0) < 1e-8 or max(x1, y1) > 1 - 1e-8
            (outer if on_square else circles).append(tag)
        gmsh.model.addPhysicalGroup(1, outer, 1)
        gmsh.model.addPhysicalGroup(1, circles, 2)
        gmsh.option.setNumber("Mesh.CharacteristicLengthMax", h)
        gmsh.option.setNumber("Mesh.MshFileVersion", 2.2)
        gmsh.model.mesh.generate(2)
        gmsh.write(path)
    finally:
        gmsh.finalize()


def channel_with_cylinder(path, h=0.06):
    gmsh.initialize(["", "-v", "0"])
    try:
        gmsh.model.add("channel_with_cylinder")
        occ = gmsh.model.occ
        L, H = 2.2, 0.41
        channel = occ.addRectangle(0, 0, 0, L, H)
        cylinder = occ.addDisk(0.2, 0.2, 0, 0.05, 0.05)
        occ.cut([(2, channel)], [(2, cylinder)])
        occ.synchronize()
        surfaces = [tag for _, tag in gmsh.model.getEntities(2)]
        gmsh.model.addPhysicalGroup(2, surfaces, 1)
        groups = {1: [], 2: [], 3: [], 4: []}
        for _, tag in gmsh.model.getBoundary([(2, s) for s in surfaces], oriented=False):
            x0, y0, _, x1, y1, _ = gmsh.model.getBoundingBox(1, tag)
            # gmsh pads bounding boxes by its geometric tolerance (~1e-7).
            if x1 < 1e-5:
                groups[1].append(tag)
            elif x0 > L - 1e-5:
                groups[2].append(tag)
            elif y1 < 1e-5 or y0 > H - 1e-5:
                groups[3].append(tag)
            else:
                groups[4].append(tag)
        for marker, tags in groups.items():
            gmsh.model.addPhysicalGroup(1, tags, marker)
        gmsh.option.setNumber("Mesh.CharacteristicLengthMax", h)
        gmsh.option.setNumber("Mesh.MshFileVersion", 2.2)
        gmsh.model.mesh.generate(2)
        gmsh.write(path)
    finally:
        gmsh.finalize()


if __name__ == "__main__":
    h = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
    plate_with_holes(os.path.join(HERE, "plate_with_holes.msh"), h)
    channel_with_cylinder(os.path.join(HERE, "channel_with_cylinder.msh"))
