"""The test suite.

moto in process is taught, before any test module runs, exactly the calls it
lacks of those fedimg makes (``devel.motoextra``: image deprecation, image
block public access, the public-AMI quota); the devel ``moto_server`` has the
same. Everything else is moto's own.
"""

from devel import motoextra

motoextra.install()
