"""One glossary of the column names used across stages, with units.

Every stage reads and writes columns named here; a name carries its unit
(``_m2``, ``_kwp``, ``_deg``, ``_kwh_per_kwp``, ``_mwh_per_year``). The
``GLOSSARY`` mapping is the single source of truth for descriptions shown in
the report and as field aliases in the GeoPackage.
"""

from __future__ import annotations

#: Canonical attribute columns that ingest fills from each source's column
#: mapping (``configs/*.yaml`` ``sources[].columns``). Missing ones are null.
ATTRIBUTE_COLUMNS: tuple[str, ...] = (
    "name",
    "name_en",
    "tag_building",
    "tag_amenity",
    "tag_office",
    "tag_landuse",
    "tag_government",
    "tag_industrial",
    "tag_building_use",
    "tag_shop",
    "tag_tourism",
    "tag_roof_shape",
    "land_use_code",
    "class_field",
    "subtype_field",
    "addr_street",
    "height_attr_m",
    "levels_attr",
)

GLOSSARY: dict[str, str] = {
    # identity and place
    "building_id": "stable id of the building in this pipeline: '<source>:<source_id>'",
    "source": "name of the input source the feature came from (config sources[].name); "
    "in the targets table, the document the target comes from",
    "source_id": "id of the feature in its source (OSM 'way/123', CBDC BuildingID, tile patch)",
    "district_name": "district the footprint centroid lies in (Chinese name)",
    "district_adcode": "administrative code of that district",
    # attributes (canonical, from the per-source column mapping)
    "name": "name of the building or feature (Chinese where known)",
    "name_en": "English name",
    "tag_building": "OSM building=* value",
    "tag_amenity": "OSM amenity=* value",
    "tag_office": "OSM office=* value",
    "tag_landuse": "OSM landuse=* value",
    "tag_government": "OSM government=* value",
    "tag_industrial": "OSM industrial=* value",
    "tag_building_use": "OSM building:use=* value",
    "tag_shop": "OSM shop=* value",
    "tag_tourism": "OSM tourism=* value",
    "tag_roof_shape": "OSM roof:shape=* value",
    "land_use_code": "survey land-use code (CBDC landUseTyp, or GB 50137-2011 code)",
    "class_field": "dataset's own building class (e.g. Overture class)",
    "subtype_field": "dataset's own building subtype (e.g. Overture subtype)",
    "addr_street": "street of the address",
    "height_attr_m": "height from the source attributes [m]",
    "levels_attr": "number of storeys from the source attributes [-]",
    "attribute_issues": "how doubtful source attributes were read ('5;6' -> 6) or why they "
    "were set to null (unparseable, out of range, undecodable text)",
    "geometry_repaired": "True where the footprint was repaired (make_valid, or Z "
    "coordinates dropped)",
    # geometry measures
    "footprint_area_m2": "footprint area in the metric working CRS [m2]",
    "height_m": "building height used by the roof stage [m]",
    "height_source": "where height_m came from (raster, attribute, levels, default)",
    "raster_height_m": "median of the height rasters within the footprint (NaN: none) [m]",
    # classification
    "building_type": "government, school, factory, hospital, other_public, commercial, "
    "residential, other or unknown",
    "type_source": "evidence that set building_type (tag, survey_code, containing_area, "
    "poi, name, default, override)",
    "type_confidence": "high, medium or low",
    # roof
    "roof_kind": "flat or pitched",
    "roof_kind_source": "where roof_kind came from (tag_roof_shape, tag_building, "
    "rule:<name>, default)",
    "setback_m": "edge setback applied, by roof kind and height band [m]",
    "utilisation_factor": "share of the set-back roof free of obstructions [-]",
    "setback_area_m2": "roof area left after the edge setback [m2]",
    "usable_area_m2": "roof area that can carry PV arrays (after setback, minimum width, "
    "utilisation and minimum array area; pitched roofs: on the slope, both planes) [m2]",
    "tilt_deg": "module tilt from horizontal (plane 1; plane 2 has the same) [deg]",
    "azimuth_deg": "module azimuth of plane 1, clockwise from north (180 = south) [deg]",
    "gcr": "ground coverage ratio: module area / usable roof area (flat: GB 50797 solstice "
    "rule; pitched: packing factor) [-]",
    "azimuth_2_deg": "azimuth of the second pitched plane (NaN: none) [deg]",
    "usable_area_2_m2": "usable area of plane 2 (included in usable_area_m2) [m2]",
    "capacity_2_kwp": "capacity on plane 2 (included in capacity_kwp) [kWp]",
    "capacity_policy_2_kwp": "policy capacity on plane 2 (included in "
    "capacity_policy_kwp) [kWp]",
    "module_area_m2": "module area on the roof = usable_area_m2 * gcr [m2]",
    "capacity_kwp": "installable DC capacity on the whole usable area [kWp]",
    "coverage_share": "policy share of roof area to carry PV for this building type [-]",
    "policy_area_m2": "roof area under PV at the policy coverage share, "
    "capped at usable_area_m2 [m2]",
    "capacity_policy_kwp": "capacity at the policy coverage share [kWp]",
    "suitable": "whether the roof can carry PV at all",
    "unsuitable_reason": "why not, when suitable is false",
    "centroid_x_m": "footprint centroid easting (roof stage, for shading; not in the "
    "final outputs) [m]",
    "centroid_y_m": "footprint centroid northing (roof stage, for shading; not in the "
    "final outputs) [m]",
    **{f"rect_c{k}{a}_m": f"corner {k} {w} of the footprint's minimum rotated rectangle, "
       "the shading obstacle (roof stage; not in the final outputs) [m]"
       for k in range(4) for a, w in (("x", "easting"), ("y", "northing"))},
    "footprint_key": "change-detection key of the footprint (roof stage, for the report; "
    "not in the final outputs)",
    **{f"footprint_{b}_m": f"footprint bounds, {w} (roof stage, for the report; not in the "
       "final outputs) [m]"
       for b, w in (("minx", "west"), ("miny", "south"), ("maxx", "east"), ("maxy", "north"))},
    # shading
    "horizon_max_deg": "highest horizon elevation of taller neighbours seen from the roof "
    "[deg]",
    "beam_loss_share": "share of plane 1's annual beam irradiation blocked by neighbours [-]",
    "unshaded_share": "plane 1's annual irradiation with neighbours / without [-]",
    "unshaded_share_2": "the same for plane 2 [-]",
    # yield
    "specific_yield_kwh_per_kwp": "annual AC energy per kWp of DC capacity [kWh/kWp]",
    "energy_mwh_per_year": "annual AC energy of capacity_kwp [MWh/yr]",
    "energy_policy_mwh_per_year": "annual AC energy of capacity_policy_kwp [MWh/yr]",
    **{f"energy_m{m:02d}_mwh": f"AC energy of capacity_kwp in month {m} [MWh]"
       for m in range(1, 13)},
    # changes since the previous run (pipeline/changes.py)
    "building_key": "identity across runs: building_id, or '<source>:geom:<hash>' of the "
    "footprint for sources without ids",
    "change": "added, removed or changed since the previous run",
    "changed_fields": "what changed: geometry, type and/or capacity",
    "building_type_previous": "building_type in the previous run",
    "capacity_previous_kwp": "capacity_kwp in the previous run (0 if added) [kWp]",
    "capacity_delta_kwp": "capacity_kwp minus the previous run's [kWp]",
    "energy_delta_mwh_per_year": "energy_mwh_per_year minus the previous run's [MWh/yr]",
    "n_added": "buildings added since the previous run",
    "n_removed": "buildings removed since the previous run",
    "n_changed": "buildings whose geometry, type or capacity changed",
    "target_verdict_previous": "target_verdict in the previous run",
    "rule_verdict_previous": "rule_verdict in the previous run",
    "verdict_flipped": "a target or coverage-rule verdict differs from the previous run's",
    "run_id": "id of the run that wrote the outputs (folder under outputs/runs/)",
    "previous_run_id": "id of the run the change report compares against",
    # rejected
    "reason": "why the feature was not kept",
    "stage": "stage that rejected it",
    # report: summaries (districts, district_types, towns)
    "n_buildings": "buildings of the input in the unit [-]",
    "capacity_mw": "capacity on the whole usable roof area [MW]",
    "capacity_policy_mw": "capacity at the policy coverage shares [MW]",
    "energy_gwh_per_year": "annual AC energy of capacity_mw [GWh/yr]",
    "co2_avoided_kt_per_year": "CO2 avoided a year by that energy at the grid factor [kt/yr]",
    "rule_name": "the roof-coverage rule",
    "rule_n_buildings": "buildings of the rule's types [-]",
    "rule_footprint_area_m2": "roof (footprint) area of the rule's types [m2]",
    "rule_required_area_m2": "roof area the rule's share asks for [m2]",
    "rule_usable_area_m2": "usable roof area of the rule's types [m2]",
    "rule_usable_share": "usable / footprint area of the rule's types [-]",
    "rule_n_below_share": "rule buildings whose usable share is below the rule [-]",
    "rule_verdict": "whether the rule's share is reachable on the input's roofs",
    # report: targets
    "target_id": "id of the MW target (config targets[].id)",
    "period": "years of the target",
    "eligible_types": "building types whose roofs count toward the target",
    "target_required_mw": "the target: new PV capacity asked for [MW]",
    "n_eligible_buildings": "eligible buildings with capacity [-]",
    "target_achievable_mw": "capacity on the eligible roofs of the input [MW]",
    "target_achievable_policy_mw": "same at the policy coverage shares [MW]",
    "target_existing_mw": "existing or planned PV in the district and period [MW]",
    "n_existing_systems": "existing or planned PV systems counted [-]",
    "target_remaining_mw": "target less existing PV: still to build [MW]",
    "target_margin_mw": "existing + achievable - required [MW]",
    "target_share_needed": "remaining / achievable: share of the eligible roofs needed [-]",
    "target_share_reachable": "(existing + achievable) / required, at most 1 [-]",
    "priority_types": "building types ranked first (the public-institution head of "
    "plan.type_priority)",
    "target_share_priority_types": "priority types' capacity / remaining, at most 1 [-]",
    "target_energy_gwh_per_year": "annual AC energy of the achievable capacity [GWh/yr]",
    "target_co2_avoided_kt_per_year": "CO2 avoided a year by that energy [kt/yr]",
    "target_verdict": "reachable / not reachable from the buildings in the input",
    "n_roofs_to_target": "ranked roofs needed to reach the remaining MW [-]",
    "mw_roofs_to_target": "capacity of those roofs [MW]",
    # report: plan, existing PV, towns, CO2
    "priority_rank": "order in which the roof should be built for the target (1 = first)",
    "cumulative_mw": "capacity of this roof and all ranked above it [MW]",
    "in_target_list": "roof is in the shortest ranked list that reaches the target",
    "existing_pv_area_m2": "roof area taken by existing or planned PV [m2]",
    "existing_pv_kwp": "existing or planned PV capacity on the roof [kWp]",
    "co2_avoided_t_per_year": "CO2 avoided a year by energy_mwh_per_year [t/yr]",
    "pv_id": "id of the existing or planned PV system",
    "pv_capacity_kwp": "capacity of the PV system [kWp]",
    "pv_year": "year the system was or will be commissioned",
    "pv_status": "installed or planned",
    "pv_roof_area_m2": "roof area of the input's buildings the system takes [m2]",
    "town_name": "sub-district unit (town, street, development zone) of the building",
    "town_potential_mw": "capacity of the target's eligible types in the town [MW]",
    "town_share": "town potential / district potential [-]",
    "town_target_mw": "the town's share of the district target [MW]",
    "town_margin_mw": "town potential - town target [MW]",
    "split_basis": "what the target is split by (potential, or town area)",
}


def describe(column: str) -> str:
    """Return the glossary description of a column.

    Parameters
    ----------
    column : str
        Column name.

    Returns
    -------
    str
        The description, or an empty string for columns not in the glossary.
    """
    return GLOSSARY.get(column, "")
